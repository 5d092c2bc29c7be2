"""Hostile programs against the sandbox: each must end as not passed (or passed only where the tests
truly pass), leave the host's files as they were, leave no process behind, and not hurt the worker.

Every case runs twice: with Linux namespaces ("namespaces") and without them ("fallback": what a
container without CAP_SYS_ADMIN gets — uid drop, child subreaper, rlimits, socket refusal).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import sys
import time
import warnings
from pathlib import Path

import pytest

from filtered_rl.verifiers.sandbox import SandboxLimits, SandboxPool

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="the sandbox relies on Linux process controls"),
    # Expected in fallback mode where Python lives in a private directory (e.g. pyenv under /root).
    pytest.mark.filterwarnings("ignore:sandboxed programs run as uid"),
]

ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False
LIMITS = SandboxLimits(timeout=2.0)
NOT_PASSED = {"failed", "timeout", "error"}
ANY = NOT_PASSED | {"passed"}


@pytest.fixture(scope="module", params=["namespaces", "fallback"])
def pool(request):
    pool = SandboxPool(1, namespaces=request.param == "namespaces").start()
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def canary(tmp_path_factory):
    directory = tmp_path_factory.mktemp("canary")
    path = directory / "canary.txt"
    path.write_text("original " + secrets.token_hex(8))
    return path


@pytest.fixture
def shared_canary():
    """A world-writable file in a world-writable directory: only a private /dev/shm protects it."""
    path = Path("/dev/shm") / f"frl-canary-{secrets.token_hex(6)}"
    path.write_text("original")
    path.chmod(0o666)
    yield path
    path.unlink(missing_ok=True)


def leftover_processes(pool: SandboxPool) -> list[str]:
    """Live processes running as a sandbox uid of this pool, or children of its (idle) workers other
    than their zygotes, or children of those zygotes."""
    uids, zygotes = set(pool.worker_uids()), set(pool.zygote_pids())
    parents = set(pool.worker_pids()) | zygotes
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = dict(
                line.split(":", 1) for line in (entry / "status").read_text().splitlines() if ":" in line
            )
        except OSError:
            continue
        state, uid, ppid = fields["State"].split()[0], int(fields["Uid"].split()[0]), int(fields["PPid"])
        if state not in ("Z", "X") and (uid in uids or ppid in parents) and int(entry.name) not in zygotes:
            found.append(f"pid {entry.name} uid {uid} ppid {ppid} {fields['Name'].strip()}")
    return found


def run_hostile(pool: SandboxPool, program: str, tests: str = "assert True", limits: SandboxLimits = LIMITS):
    worker_before, zygote_before = pool.worker_pids(), pool.zygote_pids()
    started = time.monotonic()
    result = pool.run(program, tests, limits)
    elapsed = time.monotonic() - started
    assert elapsed < limits.timeout + 5, f"the call took {elapsed:.1f}s: not bounded by the timeout"
    deadline = time.monotonic() + 2.0
    while leftover_processes(pool) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert leftover_processes(pool) == [], "processes outlived the call"
    assert pool.worker_pids() == worker_before, "the worker was killed or replaced"
    assert pool.zygote_pids() == zygote_before and len(zygote_before) == len(worker_before)
    return result


CASES = {
    "infinite_loop": ("while True:\n    pass", "assert True", {"timeout"}),
    "sleep_forever": ("import time\ntime.sleep(600)", "assert True", {"timeout"}),
    "many_forks": (
        "import os, time\nfor _ in range(300):\n    if os.fork() == 0:\n        time.sleep(60)\n"
        "        os._exit(0)",
        "assert True",
        NOT_PASSED,
    ),
    "memory_bomb": (
        "chunks = []\nwhile True:\n    chunks.append(bytearray(64 << 20))",
        "assert True",
        NOT_PASSED,
    ),
    "huge_allocation": ("x = bytearray(1 << 40)", "assert True", NOT_PASSED),
    "deep_recursion": (
        "import sys\nsys.setrecursionlimit(10**7)\ndef f(n):\n    return f(n + 1)\nf(0)",
        "assert True",
        NOT_PASSED,
    ),
    "segfault": ("import ctypes\nctypes.string_at(0)", "assert True", {"error"}),
    "os_exit_before_tests": ("import os\nos._exit(0)", "assert False", NOT_PASSED),
    "sys_exit_before_tests": ("import sys\nsys.exit(0)", "assert False", NOT_PASSED),
    "raise_system_exit": ("raise SystemExit(0)", "assert False", NOT_PASSED),
    "kill_parent": ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)", "assert False", NOT_PASSED),
    "kill_everything": (
        "import os, signal\nos.kill(-1, signal.SIGKILL)\nos.kill(1, signal.SIGKILL)",
        "assert False",
        NOT_PASSED,
    ),
    "huge_stdout": ("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", "assert True", {"error"}),
    "huge_stderr": ("import os\nwhile True:\n    os.write(2, b'x' * 65536)", "assert True", {"error"}),
    "ignore_signals": (
        "import signal\nfor s in (signal.SIGTERM, signal.SIGALRM, signal.SIGINT, signal.SIGHUP,"
        " signal.SIGXCPU):\n    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    pass",
        "assert True",
        {"timeout"},
    ),
    "patched_assertion_error": (
        "import builtins\nclass Fake(Exception):\n    pass\nbuiltins.AssertionError = Fake\n"
        "builtins.BaseException = Fake\nbuiltins.Exception = Fake\ndef f():\n    return 1",
        "assert f() == 2",
        {"failed"},
    ),
    "patched_exit_functions": (
        "import os, sys, json\nos._exit = lambda code: None\nsys.exit = lambda *a: None\n"
        "os.write = lambda fd, data: len(data)\njson.dumps = lambda *a, **k: 'passed'\n"
        "def f():\n    return 1",
        "assert f() == 2",
        {"failed"},
    ),
    "excepthook_and_atexit": (
        "import sys, atexit\nsys.excepthook = lambda *a: None\n"
        "atexit.register(lambda: print('all tests passed'))\ndef f():\n    return 1",
        "assert f() == 2",
        {"failed"},
    ),
    "forge_pass_signal": (
        "import gc, os, re, sys\ncandidates = {b'0' * 32, b'passed', b'OK'}\n"
        "frame = sys._getframe()\nwhile frame is not None:\n"
        "    candidates.update(v if isinstance(v, bytes) else str(v).encode()"
        " for v in frame.f_locals.values() if isinstance(v, (str, bytes, int)))\n"
        "    frame = frame.f_back\nfor obj in gc.get_objects():\n"
        "    for v in (obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple))"
        " else ()):\n        if isinstance(v, (str, bytes)) and re.fullmatch(r'[0-9a-f]{32}',"
        " v if isinstance(v, str) else v.decode('latin-1')):\n"
        "            candidates.add(v if isinstance(v, bytes) else v.encode())\n"
        "for fd in range(3, 32):\n    for c in candidates:\n        try:\n"
        "            os.write(fd, c)\n        except OSError:\n            pass\nos._exit(0)",
        "assert False",
        NOT_PASSED,
    ),
    "close_all_descriptors": ("import os\nos.closerange(0, 1024)", "assert True", NOT_PASSED),
    "become_root": ("import os\nos.setuid(0)\nos.setgid(0)", "assert True", NOT_PASSED if ROOT else ANY),
    # Passes its (trivial) tests, but its background processes must still be gone after the call.
    "background_children": (
        "import os, subprocess, threading, time\n"
        "subprocess.Popen(['sleep', '60'], start_new_session=True)\n"
        "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(60)\n"
        "    os._exit(0)\nthreading.Thread(target=time.sleep, args=(60,)).start()\n"
        "def f():\n    return 1",
        "assert f() == 1",
        {"passed"},
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_program_is_contained(pool, canary, name):
    program, tests, expected = CASES[name]
    before = canary.read_text()
    result = run_hostile(pool, program, tests)
    assert result.status in expected, f"{name}: {result}"
    assert canary.read_text() == before


@pytest.mark.skipif(
    not ROOT, reason="protecting the caller's own files needs root (the program runs as another uid)"
)
@pytest.mark.parametrize(
    "attack",
    [
        "import os\nos.remove({path!r})",
        "open({path!r}, 'w').write('pwned')",
        "import shutil\nshutil.rmtree({dir!r})",
        "import os\nos.rename({path!r}, {path!r} + '.moved')",
        "import os\nos.chmod({dir!r}, 0o777)",
    ],
)
def test_files_outside_the_temp_dir_are_untouched(pool, canary, attack):
    before = canary.read_text()
    result = run_hostile(pool, attack.format(path=str(canary), dir=str(canary.parent)))
    assert result.status in NOT_PASSED, result
    assert canary.read_text() == before
    assert canary.parent.stat().st_mode & 0o777 != 0o777


@pytest.mark.skipif(not ROOT, reason="needs root (uid drop or a private /tmp)")
@pytest.mark.parametrize("directory", ["/tmp", "/var/tmp", "/dev/shm"])
def test_nothing_is_left_in_shared_temp_dirs(pool, directory):
    if not os.path.isdir(directory):
        pytest.skip(f"{directory} does not exist here")
    target = Path(directory) / f"frl-evil-{secrets.token_hex(6)}"
    run_hostile(pool, f"open({str(target)!r}, 'w').write('left behind')")
    assert not target.exists()


def test_world_writable_file_is_protected_by_private_mounts(pool, shared_canary):
    if not pool.capabilities().get("mount_namespace"):
        pytest.skip("no mount namespace: world-writable files outside the temp dir are not protected")
    # The program sees a private, empty /dev/shm: its write lands there and vanishes with the job.
    run_hostile(pool, f"open({str(shared_canary)!r}, 'w').write('pwned')")
    assert shared_canary.read_text() == "original"


@pytest.mark.parametrize("how", ["socket", "raw_socket"])
def test_network_is_refused(pool, how):
    caps = pool.capabilities()
    if how == "raw_socket" and not caps.get("net_namespace"):
        pytest.skip("no network namespace: only the socket module is patched, `_socket` gets through")
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.3)
    port = server.getsockname()[1]
    program = {
        "socket": f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\ns.sendall(b'x')",
        "raw_socket": f"import _socket\ns = _socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))",
    }[how]
    try:
        result = run_hostile(pool, program)
        assert result.status in NOT_PASSED, result
        with pytest.raises(TimeoutError):
            server.accept()
    finally:
        server.close()


def test_program_still_runs_normally_after_hostile_ones(pool):
    """The worker survives everything above and still verifies honest programs both ways."""
    assert run_hostile(pool, "def add(a, b):\n    return a + b", "assert add(2, 3) == 5").status == "passed"
    assert run_hostile(pool, "def add(a, b):\n    return a - b", "assert add(2, 3) == 5").status == "failed"


def test_namespaces_are_used_where_available():
    """On Linux as root (here and in CI) the strong mechanisms must actually be in force."""
    if not ROOT:
        pytest.skip("not root: namespaces and uid drop are unavailable")
    pool = SandboxPool(1)
    try:
        caps = pool.capabilities()
        print("sandbox isolation:", caps)
        assert caps["uid_drop"]
        if caps["pid_namespace"]:
            # In the namespace the tests' process is PID 1 and the program's PID 2, as another uid; its
            # /proc shows its own network namespace (loopback only) and no other process.
            program = (
                "import os\nassert os.getpid() == 2 and os.getppid() == 1 and os.getuid() != 0\n"
                "net = open('/proc/self/net/dev').readlines()[2:]\n"
                "devices = [line.split(':')[0].strip() for line in net]\n"
                "assert devices == ['lo'], devices\n"
                "assert [p for p in os.listdir('/proc') if p.isdigit()] == [os.readlink('/proc/self')]"
            )
            assert pool.run(program, "assert True").status == "passed"
    finally:
        pool.close()


@pytest.mark.parametrize("namespaces", [True, False], ids=["namespaces", "fallback"])
def test_unreadable_python_warning_is_true(namespaces):
    """The warning fires exactly when programs cannot import an unpreloaded stdlib module, and says what
    was found: the unreadable paths and why no mount namespace exposed them."""
    pool = SandboxPool(1, namespaces=namespaces)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = pool.run("import email.mime.text  # not preloaded", "assert True", LIMITS)
        caps = pool.capabilities()
        warned = [str(w.message) for w in caught if "cannot read" in str(w.message)]
        assert len(warned) == (0 if caps["python_readable"] else 1), warned
        assert (result.status == "passed") == caps["python_readable"], (result, caps)
        if warned:
            assert all(path in warned[0] for path in caps["python_unreadable"])
            assert caps["python_note"] in warned[0]
            if not namespaces:
                assert "namespaces=False was requested" in warned[0]
    finally:
        pool.close()


def test_a_killed_zygote_costs_one_job_and_the_pool_recovers():
    pool = SandboxPool(1)
    try:
        assert pool.run("x = 1", "assert x == 1", LIMITS).passed
        worker, zygote = pool.worker_pids(), pool.zygote_pids()
        os.kill(zygote[0], signal.SIGKILL)
        assert pool.run("x = 1", "assert x == 1", LIMITS).status == "error"
        assert pool.run("x = 1", "assert x == 1", LIMITS).passed
        assert pool.worker_pids() != worker and pool.zygote_pids() != zygote
    finally:
        pool.close()


@pytest.mark.parametrize("parent_mode", [0o700, 0o755], ids=["private-parent", "open-parent"])
def test_a_checkout_and_venv_under_tmp_still_run_programs(parent_mode):
    """The private /tmp is a fresh tmpfs: a project or virtual environment living below /tmp (a CI clone
    in /tmp/x, pytest's 0700 /tmp/pytest-of-root/...) must stay reachable, read-only, for the worker,
    its zygote and the programs. Both layouts once failed every job (the zygote could not be exec'd)."""
    import shutil
    import subprocess
    import tempfile

    base = Path(tempfile.mkdtemp(dir="/tmp", prefix="filtered-rl-sandbox-"))
    try:
        base.chmod(parent_mode)
        repo = Path(__file__).resolve().parents[1]
        checkout = base / "checkout"
        shutil.copytree(
            repo / "filtered_rl", checkout / "filtered_rl", ignore=shutil.ignore_patterns("__pycache__")
        )
        venv = base / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
        script = (
            "from filtered_rl.verifiers.sandbox import SandboxPool\n"
            "pool = SandboxPool(1)\n"
            "print(pool.run('def add(a, b):\\n    return a + b', 'assert add(2, 3) == 5').status)\n"
            "print(pool.run('import fractions\\nx = fractions.Fraction(1, 2)', 'assert x * 2 == 1').status)\n"
            "pool.close()\n"
        )
        done = subprocess.run(
            [str(venv / "bin" / "python"), "-c", script],
            capture_output=True,
            text=True,
            cwd=base,
            env={**os.environ, "PYTHONPATH": str(checkout)},
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.split() == ["passed", "passed"], done.stdout + done.stderr[-2000:]
    finally:
        shutil.rmtree(base)

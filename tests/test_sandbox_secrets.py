"""Canaries against the code sandbox: what an adversarial program must not reach, in both modes.

Each attack here once succeeded (issue #22): the caller's environment read off the program's own stack,
a host process's command line read from /proc, the project tree and /etc readable, the canaries sent
out through a Unix socket by file path (or, without namespaces, TCP through `_socket`), the hidden
tests read and a pass forged from the harness's frames, and no memory cap across a job's processes.
Every case runs with Linux namespaces ("namespaces") and without ("fallback": a container without
CAP_SYS_ADMIN), and the canaries are planted in the caller *before* the pool starts, as a trainer's
HF_TOKEN is.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from filtered_rl.verifiers.sandbox import SandboxLimits, SandboxPool

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="the sandbox relies on Linux process controls"),
    pytest.mark.filterwarnings("ignore:sandboxed programs run as uid"),
]

ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False
LIMITS = SandboxLimits(timeout=5.0)
CANARY = "sk-canary-" + secrets.token_hex(8)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=["namespaces", "fallback"])
def pool(request):
    saved = dict(os.environ)
    os.environ.update({"FAKE_API_KEY": CANARY, "HF_TOKEN": "hf_" + CANARY, "WANDB_API_KEY": CANARY})
    try:
        pool = SandboxPool(1, namespaces=request.param == "namespaces").start()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def host_process():
    """A host process whose command line holds a secret, as `--hub_token=...` would."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", f"--hub_token={CANARY}"],
        stdin=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while (
        CANARY.encode() not in Path(f"/proc/{proc.pid}/cmdline").read_bytes() and time.monotonic() < deadline
    ):
        time.sleep(0.05)  # until the interpreter has been exec'd
    yield proc
    proc.kill()
    proc.wait()


def probe(pool: SandboxPool, program: str, tests: str = "assert found == [], found") -> str:
    """Run a program that collects what it found in `found`; its status (passed: nothing found), with
    what was found in the failure's reason."""
    result = pool.run(program, tests, LIMITS)
    return result.status if result.passed else f"{result.status}: {result.reason}"


SCAN_MEMORY = f"""
import ctypes, os
found = []
canary = {CANARY!r}.encode()
if canary in repr(dict(os.environ)).encode():
    found.append("os.environ")
libc = ctypes.CDLL(None)
libc.getauxval.restype = ctypes.c_ulong
# The block of argument and environment strings at the top of the process stack: from glibc's
# __libc_stack_end up to the executable's name (AT_EXECFN), the last string there. No /proc needed.
start = ctypes.c_void_p.in_dll(libc, "__libc_stack_end").value
end = libc.getauxval(31) + 4096 - (libc.getauxval(31) % 4096)
stack = ctypes.string_at(start, end - start)
assert len(stack) > 0
if canary in stack:
    found.append("stack")
try:
    maps = open("/proc/self/maps").read().splitlines()
except OSError:
    maps = []
for line in maps:
    if "[stack]" in line:
        low, high = (int(x, 16) for x in line.split()[0].split("-"))
        if canary in ctypes.string_at(low, high - low):
            found.append("[stack] mapping")
"""

SCAN_PROC = f"""
import os
found = []
canary = {CANARY!r}.encode()
try:
    pids = [p for p in os.listdir("/proc") if p.isdigit()]
except OSError:
    pids = []
for pid in pids:
    for name in ("cmdline", "environ"):
        try:
            with open(f"/proc/{{pid}}/{{name}}", "rb") as f:
                if canary in f.read():
                    found.append((pid, name))
        except OSError:
            pass
"""


def test_the_callers_environment_is_not_in_the_programs_memory(pool):
    assert probe(pool, SCAN_MEMORY) == "passed"


def test_host_processes_command_lines_and_environments_are_unreadable(pool, host_process):
    assert Path(f"/proc/{host_process.pid}/cmdline").read_bytes().find(CANARY.encode()) > 0
    assert probe(pool, SCAN_PROC) == "passed"


@pytest.mark.skipif(not ROOT, reason="the program runs as the caller's uid: it may read the caller's files")
def test_files_outside_the_temp_dir_are_unreadable(pool):
    """A canary file in the caller's home, the project's files and git config, /etc: none of them
    readable. Directories on the way to the interpreter may be listed (the sandbox's root recreates
    them) but show nothing else: no project files, nothing in /etc, no home directory."""
    directory = Path(tempfile.mkdtemp(dir=Path.home(), prefix="frl-canary-"))
    secret = directory / "secret.txt"
    try:
        secret.write_text(CANARY)
        directory.chmod(0o755)
        secret.chmod(0o644)  # permissions alone would let any uid read it: only isolation stops it
        targets = [str(secret), str(REPO / "pyproject.toml"), "/etc/passwd", "/etc/hostname"]
        if (REPO / ".git" / "config").exists():
            targets.append(str(REPO / ".git" / "config"))
        program = (
            "import os\nfound = []\n"
            f"for path in {targets!r}:\n"
            "    try:\n        found.append((path, open(path).read()[:20]))\n    except OSError:\n        pass\n"
            f"for path in {[str(directory), str(REPO), '/etc', str(Path.home())]!r}:\n"
            "    try:\n        names = set(os.listdir(path)) - {'.venv', '.cache', '.pyenv', 'filtered_rl'}\n"
            "    except OSError:\n        continue\n"
            "    if names:\n        found.append((path, sorted(names)[:5]))\n"
        )
        assert probe(pool, program) == "passed"
    finally:
        secret.unlink()
        directory.rmdir()


@pytest.fixture
def path_socket():
    """A Unix socket listening by file path outside every temp dir, open to any uid."""
    for parent in ("/run/lock", "/run", "/var/run"):
        if os.path.isdir(parent) and os.access(parent, os.W_OK):
            break
    else:
        pytest.skip("no writable directory outside the temp dirs for a socket")
    directory = tempfile.mkdtemp(dir=parent, prefix="frl-")
    os.chmod(directory, 0o777)
    path = os.path.join(directory, "s.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    os.chmod(path, 0o777)
    server.listen(4)
    server.settimeout(0.5)
    yield path, server
    server.close()
    os.unlink(path)
    os.rmdir(directory)


@pytest.mark.parametrize("module", ["socket", "_socket"])
def test_a_unix_socket_by_path_cannot_carry_the_canary_out(pool, path_socket, module):
    path, server = path_socket
    program = (
        f"import os, {module} as s\nx = s.socket(s.AF_UNIX, s.SOCK_STREAM)\nx.connect({path!r})\n"
        "x.sendall(repr(dict(os.environ)).encode())"
    )
    status = pool.run(program, "assert True", LIMITS).status
    with pytest.raises(TimeoutError):
        server.accept()
    assert status != "passed"


def test_tcp_through_the_low_level_module_is_refused(pool):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    try:
        port = server.getsockname()[1]
        program = f"import _socket\nx = _socket.socket()\nx.settimeout(1)\nx.connect(('127.0.0.1', {port}))"
        assert pool.run(program, "assert True", LIMITS).status != "passed"
        with pytest.raises(TimeoutError):
            server.accept()
    finally:
        server.close()


FRAME_FORGERY = (
    "import sys, ctypes\n"
    "f = sys._getframe(1)\n"
    "f.f_locals['tests'] = 'pass'\n"
    "ctypes.pythonapi.PyFrame_LocalsToFast(ctypes.py_object(f), ctypes.c_int(0))\n"
)
TRACE_FORGERY = (
    "import sys\n"
    "def tracer(frame, event, arg):\n"
    "    for name, value in list(frame.f_locals.items()):\n"
    "        if isinstance(value, str) and 'assert' in value:\n"
    "            frame.f_locals[name] = 'pass'\n"
    "    return tracer\n"
    "frame = sys._getframe()\n"
    "while frame is not None:\n"
    "    frame.f_trace = tracer\n"
    "    frame = frame.f_back\n"
    "sys.settrace(tracer)\n"
)
ALWAYS_EQUAL = (
    "class Anything:\n"
    "    def __eq__(self, other):\n        return True\n"
    "    def __ne__(self, other):\n        return False\n"
    "def f(x):\n    return Anything()\n"
)


@pytest.mark.parametrize(
    "program",
    [FRAME_FORGERY, TRACE_FORGERY, ALWAYS_EQUAL],
    ids=["frame-locals", "settrace", "always-equal"],
)
def test_a_pass_cannot_be_forged(pool, program):
    tests = "assert f(1) == 2\nassert False"
    program = program + ("" if "def f" in program else "def f(x):\n    return x\n")
    assert pool.run(program, tests, LIMITS).status == "failed"


def test_the_hidden_tests_are_unreadable(pool):
    """The program answers 1 only if it found the tests' text anywhere it can look: its frames, every
    object `gc` knows, its whole readable memory. It looks for the marker by a pattern that does not
    match itself, so that the search cannot find its own needle."""
    marker = "MARKER" + secrets.token_hex(6)
    program = r"""
import ctypes, gc, re, sys
pattern = re.compile(r"MARKER[0-9a-f]{12}")
seen = False
frame = sys._getframe()
while frame is not None and not seen:
    seen = any(pattern.search(repr(v)) for v in list(frame.f_locals.values()))
    frame = frame.f_back
for obj in gc.get_objects():
    if seen:
        break
    try:
        seen = pattern.search(repr(obj)[:100000]) is not None
    except Exception:
        pass
try:
    maps = open("/proc/self/maps").read().splitlines()
except OSError:
    maps = []
for line in maps:
    fields = line.split()
    low, high = (int(x, 16) for x in fields[0].split("-"))
    special = len(fields) > 5 and fields[5].startswith("[") and fields[5] not in ("[heap]", "[stack]")
    if fields[1].startswith("r") and not special and high - low < (1 << 28) and not seen:
        try:
            seen = re.search(rb"MARKER[0-9a-f]{12}", ctypes.string_at(low, high - low)) is not None
        except Exception:
            pass
def f():
    return 1 if seen else 0
"""
    assert pool.run(program, f"assert f() == 1  # {marker}", LIMITS).status == "failed"


@pytest.mark.skipif(not ROOT, reason="a job's memory cgroup needs root")
def test_a_jobs_processes_share_one_memory_cap(pool):
    """Eight children touching 300 MB each fit every per-process limit (1 GiB address space) but not
    a 1 GiB cap on the job as a whole: some child must be killed."""
    if not pool.capabilities().get("memory_cgroup"):
        pytest.skip("no memory cgroup on this machine")
    program = (
        "import os\npids = []\nfor _ in range(8):\n    pid = os.fork()\n    if pid == 0:\n"
        "        block = bytearray(300 << 20)\n        for i in range(0, len(block), 4096):\n"
        "            block[i] = 1\n        import time\n        time.sleep(2)\n        os._exit(0)\n"
        "    pids.append(pid)\n"
        "codes = [os.waitpid(pid, 0)[1] for pid in pids]\n"
    )
    limits = SandboxLimits(timeout=20.0, memory_bytes=1 << 30)
    result = pool.run(program, "assert all(code == 0 for code in codes), codes", limits)
    assert result.status != "passed", result
    # The worker survives the cgroup's OOM kill and still verifies honest programs.
    assert pool.run("x = 1", "assert x == 1", LIMITS).passed


def test_math_helpers_start_without_the_callers_secrets():
    """The math verifier's helpers parse untrusted text with SymPy: they hold nothing of the caller's."""
    from filtered_rl.verifiers.math import _pool

    saved = dict(os.environ)
    os.environ["FAKE_API_KEY"] = CANARY
    try:
        pool = _pool(1, 987_654_321)  # a size of its own: started now, under the canary
        pid = pool.hello() and pool.pids()[0]
    finally:
        os.environ.clear()
        os.environ.update(saved)
    try:
        assert CANARY.encode() not in Path(f"/proc/{pid}/environ").read_bytes()
    finally:
        pool.close()

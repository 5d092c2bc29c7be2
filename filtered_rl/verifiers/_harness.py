"""The harness: the program and its tests in two processes, so that the program cannot touch the tests.

Why two. In one interpreter the program owns everything the tests use: it can read the hidden tests
off the harness's frames, rewrite them (`sys._getframe(1).f_locals` + `PyFrame_LocalsToFast`, or a
trace function), read the pass nonce, or return an object whose `__eq__` is always true. So the
harness forks, before the tests exist anywhere in its memory:

    harness (tests process: runs the tests, holds the pass nonce, never runs program code)
      └─ program process: runs the program, then answers calls

The tests run in the harness with every name the program defined resolved over a socket pair: a
function becomes a stub that sends its arguments and receives its return value, both as *data*
(`encode` / `decode`: None, bool, int, float, complex, str, bytes, list, tuple, set, frozenset, dict,
range, iterators and dict views as their items; exact types only, so no subclass or object with its
own `__eq__` crosses: a subclass of a built-in type crosses as that type, `Fraction` and `Decimal` as
themselves, and any other object as an `Opaque` stand-in that keeps only its truth and its repr). A
module name resolves to the harness's own import of that module. Exceptions
come back by type name (a built-in exception type is re-raised as itself). The tests reach the harness
through a pipe that is read only after the program process has said it finished; the program process
closed that pipe, the nonce pipe and the result pipe before running a line of the program.

What changes for honest programs: a value that is not plain data (an instance of a class the program
defines) reaches the tests only as its truth and repr, and arguments are copies (a test that checks an
argument mutated in place fails); arguments must be plain data too (a test passing a lambda fails). HumanEval's and MBPP's canonical solutions all pass (tests assert it).
"""

from __future__ import annotations

import builtins
import json
import os
import socket
import struct
import sys
from typing import Any

_LEN = struct.Struct("<I")
# Bound now, before any program runs: a program that patches `json` in its own process must not break
# its process's replies (it cannot change the verdict either way: that is decided in the harness).
_dumps, _loads = json.dumps, json.loads
MAX_MESSAGE = 64 << 20
_SEQUENCES = {list: "l", tuple: "t", set: "e", frozenset: "z"}
_VIEWS = {type({}.keys()): "K", type({}.values()): "V", type({}.items()): "E"}
_BASES = (dict, list, tuple, set, frozenset, str, bytes, int, float, complex)


class Unencodable(TypeError):
    """A value that is not plain data."""


def encode(value: Any, depth: int = 0) -> list:
    """`value` as JSON-able tagged data; exact built-in types only (see the module docstring)."""
    if depth > 200:
        raise Unencodable("nested deeper than 200 levels")
    kind = type(value)
    if value is None:
        return ["n"]
    if kind is bool:
        return ["b", value]
    if kind is int:
        return ["i", hex(value)]  # no str() digit limit, exact
    if kind is float:
        return ["f", value.hex()]  # exact, inf and nan included
    if kind is complex:
        return ["c", value.real.hex(), value.imag.hex()]
    if kind is str:
        return ["s", value]
    if kind is bytes or kind is bytearray:
        return ["y" if kind is bytes else "Y", value.hex()]
    if kind in _SEQUENCES:
        return [_SEQUENCES[kind], [encode(v, depth + 1) for v in value]]
    if kind is dict:
        return ["d", [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]]
    if kind is range:
        return ["r", value.start, value.stop, value.step]
    if kind in _VIEWS:
        return [_VIEWS[kind], [encode(v, depth + 1) for v in value]]
    if hasattr(kind, "__next__") and hasattr(kind, "__iter__"):  # generators, map, zip, iterators
        return ["I", [encode(v, depth + 1) for v in value]]
    if kind.__module__ in ("fractions", "decimal") and kind.__name__ in ("Fraction", "Decimal"):
        return ["q" if kind.__name__ == "Fraction" else "D", str(value)]
    for base in _BASES:  # Counter, OrderedDict, namedtuple, IntEnum...: their value as the base type
        if isinstance(value, base):
            plain = base(value)
            if type(plain) is base:
                return encode(plain, depth + 1)
    try:  # anything else: an object the tests can only test for truth (identity-equal to nothing)
        truth = bool(value)
    except Exception:
        truth = False
    try:
        text = repr(value)[:200]
    except Exception:
        text = f"<{kind.__name__}>"
    return ["o", kind.__name__, truth, text]


def decode(data: Any) -> Any:
    """The value `encode` described; ValueError on anything malformed."""
    if not isinstance(data, list) or not data or not isinstance(data[0], str):
        raise ValueError("malformed value")
    tag, rest = data[0], data[1:]
    if tag == "n":
        return None
    if tag == "b" and type(rest[0]) is bool:
        return rest[0]
    if tag == "i":
        return int(rest[0], 16)
    if tag == "f":
        return float.fromhex(rest[0])
    if tag == "c":
        return complex(float.fromhex(rest[0]), float.fromhex(rest[1]))
    if tag == "s" and type(rest[0]) is str:
        return rest[0]
    if tag in ("y", "Y"):
        return (bytes if tag == "y" else bytearray).fromhex(rest[0])
    if tag in ("l", "t", "e", "z", "I", "K", "V", "E") and type(rest[0]) is list:
        items = [decode(v) for v in rest[0]]
        return {
            "l": list,
            "t": tuple,
            "e": set,
            "z": frozenset,
            "I": iter,
            "K": lambda xs: dict.fromkeys(xs).keys(),
            "V": lambda xs: dict(enumerate(xs)).values(),
            "E": lambda xs: dict(xs).items(),
        }[tag](items)
    if tag == "d" and type(rest[0]) is list:
        return {decode(k): decode(v) for k, v in rest[0]}
    if tag == "r":
        return range(*(int(x) for x in rest[:3]))
    if tag == "q":
        from fractions import Fraction

        return Fraction(str(rest[0]))
    if tag == "D":
        from decimal import Decimal

        return Decimal(str(rest[0]))
    if tag == "o":
        return Opaque(str(rest[0]), bool(rest[1]), str(rest[2]))
    raise ValueError(f"malformed value (tag {tag!r})")


class Opaque:
    """A value of the program that is not data (a regex match, an instance of its own class): the tests
    may test its truth and print it; it equals nothing but itself."""

    __slots__ = ("type_name", "truth", "text")

    def __init__(self, type_name: str, truth: bool, text: str):
        self.type_name, self.truth, self.text = type_name, truth, text

    def __bool__(self) -> bool:
        return self.truth

    def __repr__(self) -> str:
        return self.text

    __hash__ = object.__hash__


class Channel:
    """Length-prefixed JSON messages over one end of the socket pair."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._sendall, self._recv = sock.sendall, sock.recv  # bound now, like `_dumps`

    def send(self, message: Any) -> None:
        data = _dumps(message).encode("utf-8", "surrogatepass")
        self._sendall(_LEN.pack(len(data)) + data)

    def receive(self) -> Any:
        (size,) = _LEN.unpack(self._exact(_LEN.size))
        if size > MAX_MESSAGE:
            raise ValueError(f"a message of {size} bytes from the program process")
        return _loads(self._exact(size).decode("utf-8", "surrogatepass"))

    def _exact(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self._recv(min(size - len(data), 1 << 20))
            if not chunk:
                raise EOFError("the program's process ended")
            data += chunk
        return data


# --------------------------------------------------------------------------------------------------
# The program's process.
# --------------------------------------------------------------------------------------------------


def _describe(exc: BaseException) -> str:
    try:
        return f"{type(exc).__name__}: {exc}"[:500]
    except BaseException:
        return type(exc).__name__


def run_program(program: str, channel: Channel) -> None:
    """Run the program, say so (with the names it defined), then answer lookups and calls until EOF."""
    namespace: dict[str, Any] = {"__name__": "__sandbox__", "__builtins__": builtins}
    try:
        exec(compile(program, "<program>", "exec"), namespace)
    except BaseException as exc:
        channel.send(["error", _describe(exc)])
        return
    # Each name with what it is now: the tests need no round trip to learn that a function is one.
    kinds = {name: "callable" if callable(value) else "other" for name, value in namespace.items()}
    channel.send(["ready", {name: kind for name, kind in kinds.items() if type(name) is str}])
    while True:
        try:
            request = channel.receive()
        except (EOFError, OSError, ValueError):
            return
        channel.send(_answer(request, namespace))


def _answer(request: list, namespace: dict[str, Any]) -> list:
    try:
        if request[0] == "lookup":
            if request[1] not in namespace:
                return ["missing"]
            value = namespace[request[1]]
            if type(value) is type(sys):
                return ["module", value.__name__]
            return ["callable"] if callable(value) else ["value", encode(value)]
        function = namespace[request[1]]
        args, kwargs = decode(request[2]), decode(request[3])
        result = function(*args, **kwargs)
    except BaseException as exc:
        return ["raise", type(exc).__name__, _describe(exc)]
    try:
        return ["ok", encode(result)]
    except BaseException as exc:
        return ["raise", "TypeError", f"the program returned something the tests cannot receive: {exc}"]


# --------------------------------------------------------------------------------------------------
# The tests' process.
# --------------------------------------------------------------------------------------------------


def _reraise(type_name: str, message: str) -> BaseException:
    kind = getattr(builtins, type_name, None)
    if isinstance(kind, type) and issubclass(kind, Exception):
        try:
            return kind(message.partition(": ")[2])
        except Exception:
            pass
    return RuntimeError(message)


class ProgramFunction:
    """A function of the program, called in the program's process with copies of its arguments."""

    def __init__(self, channel: Channel, name: str):
        self._channel, self.__name__ = channel, name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._channel.send(["call", self.__name__, encode(args), encode(kwargs)])
        reply = self._channel.receive()
        if reply[0] == "ok":
            return decode(reply[1])
        raise _reraise(str(reply[1]), str(reply[2]))

    def __repr__(self) -> str:
        return f"<program function {self.__name__}>"


class TestNamespace(dict):
    """The tests' globals: what the tests define, and every name the program defined, resolved in the
    program's process on use (each use: a value can change between calls)."""

    def __init__(self, channel: Channel, program_names: dict[str, str]):
        super().__init__(__name__="__main__", __builtins__=builtins)
        self._channel, self._program_names = channel, dict(program_names)

    def __missing__(self, name: str) -> Any:
        kind = self._program_names.get(name)
        if kind is None or name.startswith("__"):
            raise KeyError(name)  # then the built-ins, else NameError
        if kind == "callable":  # (a module is not callable: it is looked up below)
            return ProgramFunction(self._channel, name)
        self._channel.send(["lookup", name])
        reply = self._channel.receive()
        if reply[0] == "callable":
            return ProgramFunction(self._channel, name)
        if reply[0] == "module" and str(reply[1]).partition(".")[0] in sys.stdlib_module_names:
            return __import__(str(reply[1]))  # the harness's own copy of a standard module
        if reply[0] == "value":
            return decode(reply[1])
        raise KeyError(name)


def run_tests(tests: str, channel: Channel, program_names: dict[str, str]) -> None:
    """Run the tests (raises what they raise)."""
    exec(compile(tests, "<tests>", "exec"), TestNamespace(channel, program_names))


def start(program: str, result_fd: int, nonce_fd: int, tests_fd: int) -> None:
    """In the harness, after its isolation: fork the program's process, run the tests, report. Never
    returns. Everything the report needs is bound to locals before the fork; nothing of the program runs
    in this process."""
    write, read, exit_, dumps = os.write, os.read, os._exit, json.dumps

    def end_program() -> None:
        """Kill and reap the program's process now: left to the kernel or the zygote, an orphan costs
        more (and without a PID namespace it would outlive this process)."""
        try:
            kill(program_pid, 9)
            wait(program_pid, 0)
        except BaseException:
            pass

    def report(status: str, reason: str) -> None:
        try:
            end_program()
            write(result_fd, b"F" + dumps({"status": status, "reason": reason[:500]}).encode())
        finally:
            exit_(1)

    ours, theirs = socket.socketpair()
    kill, wait = os.kill, os.waitpid
    program_pid = os.fork()
    if program_pid == 0:
        try:
            ours.close()
            for fd in (result_fd, nonce_fd, tests_fd):
                os.close(fd)
            run_program(program, Channel(theirs))
        finally:
            exit_(0)
    theirs.close()
    del program
    channel = Channel(ours)
    try:
        ready = channel.receive()
    except BaseException as exc:
        report("error", f"the program's process ended before the tests ran ({_describe(exc)})")
    if ready[0] != "ready" or type(ready[1]) is not dict:
        report("error", str(ready[1]) if ready[0] == "error" else "unexpected message from the program")
    chunks = []
    while chunk := read(tests_fd, 1 << 16):
        chunks.append(chunk)
    os.close(tests_fd)
    try:
        run_tests(b"".join(chunks).decode("utf-8", "surrogatepass"), channel, ready[1])
    except BaseException as exc:
        report("failed", _describe(exc))
    try:
        end_program()
        write(result_fd, read(nonce_fd, 64))
    except BaseException:
        exit_(1)
    exit_(0)

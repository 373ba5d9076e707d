"""Run untrusted Python (model-written code) in a child process with resource limits, a throw-away directory and no
network, and say how it ended: passed, failed, timeout, memory, or error (the harness itself could not run it).

This contains accidents (infinite loops, memory bombs, stray files, early exits, network calls), not a determined
attacker: the child runs as the same user, so code that goes looking for the sentinel or raises its own limits can."""

import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

OUTPUT_LIMIT_BYTES = 16 * 2**20  # RLIMIT_FSIZE: also caps stdout/stderr, which are files, so a print loop stays bounded
DETAIL_CHARS = 2000
GUARDS = ("netns", "socket-guard")

# The child's entry point. It reads the sentinel and the program from stdin (not argv: /proc/<pid>/cmdline is easy to
# read), cuts the network, sets the limits, announces the guard on stdout's first line and only then runs the program,
# so nothing the program prints can come before the guard line or forge it.
_RUNNER = r"""
import os, resource, sys

def _cut_network(allow_netns):
    if allow_netns and os.geteuid() == 0 and hasattr(os, "unshare"):
        try:
            os.unshare(os.CLONE_NEWNET)  # a new namespace holds only a loopback that is down: nothing is reachable
            return "netns"
        except OSError:
            pass
    import socket

    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in the sandbox")

    for name in ("connect", "connect_ex", "bind", "sendto", "sendmsg"):
        setattr(socket.socket, name, refuse)
    for name in ("create_connection", "create_server", "getaddrinfo", "gethostbyname", "gethostbyname_ex",
                 "gethostbyaddr", "getnameinfo"):
        setattr(socket, name, refuse)
    return "socket-guard"

def _run():
    memory_bytes, cpu_s, fsize_bytes, allow_netns = (int(arg) for arg in sys.argv[1:])
    sentinel = sys.stdin.readline().strip()
    source = sys.stdin.read()
    guard = _cut_network(allow_netns)
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_bytes, fsize_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    sys.stdout.write(guard + "\n")
    sys.stdout.flush()
    code = compile(source, "<program>", "exec")
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    sys.stdout.flush()
    os.write(1, ("\n" + sentinel + "\n").encode())  # os.write: the program may have swapped sys.stdout

_run()
"""


@dataclass(frozen=True)
class ExecResult:
    status: str  # "passed" | "failed" | "timeout" | "memory" | "error"
    detail: str  # the tail of stderr, or why the run ended the way it did
    seconds: float
    network_guard: str  # "netns" | "socket-guard", or "unknown" when the runner died before choosing


def run_program(
    source: str, *, timeout_s: float = 10.0, memory_mb: int = 1024, allow_netns: bool = True
) -> ExecResult:
    """Run `source` as a script in a fresh process and temporary directory. Never raises for what the code does.

    `allow_netns=False` skips the network namespace and uses the socket guard, the fallback for non-root hosts."""
    sentinel = secrets.token_hex(16)
    limits = [memory_mb * 2**20, int(timeout_s) + 2, OUTPUT_LIMIT_BYTES, int(allow_netns)]
    with tempfile.TemporaryDirectory(prefix="internlm2-sandbox-", ignore_cleanup_errors=True) as root:
        # The program's cwd is a subdirectory so that clearing its cwd cannot touch the runner's stdin/stdout files.
        work = os.path.join(root, "work")
        os.mkdir(work)
        stdin_path = os.path.join(root, "stdin")
        with open(stdin_path, "w", encoding="utf-8") as f:
            f.write(sentinel + "\n" + source)
        # Files, not pipes: nothing to drain while waiting, and a grandchild holding them open cannot block us.
        with (
            open(stdin_path, "rb") as stdin,
            tempfile.TemporaryFile(dir=root) as stdout,
            tempfile.TemporaryFile(dir=root) as stderr,
        ):
            start = time.monotonic()
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-c", _RUNNER, *map(str, limits)],
                    stdin=stdin,
                    stdout=stdout,
                    stderr=stderr,
                    cwd=work,
                    # A minimal environment: the harness's variables (tokens, accelerator flags) are not the program's.
                    env={"PATH": os.defpath, "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"},
                    start_new_session=True,
                )
            except OSError as exc:
                return ExecResult("error", f"could not start the sandbox: {exc}", time.monotonic() - start, "unknown")
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            # Also after a normal exit: the program may have left children behind in its process group.
            _kill_group(proc.pid)
            proc.wait()
            seconds = time.monotonic() - start
            stdout.seek(0)
            out = stdout.read()
            stderr.seek(0)
            err = stderr.read()
    return _classify(proc.returncode, timed_out, out, err, sentinel, timeout_s, seconds)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _classify(
    returncode: int, timed_out: bool, out: bytes, err: bytes, sentinel: str, timeout_s: float, seconds: float
) -> ExecResult:
    first_line, _, rest = out.partition(b"\n")
    guard = first_line.decode("utf-8", "replace")
    guard = guard if guard in GUARDS else "unknown"
    tail = err[-DETAIL_CHARS:].decode("utf-8", "replace")

    def result(status: str, detail: str) -> ExecResult:
        return ExecResult(status, detail, seconds, guard)

    if timed_out:
        return result("timeout", f"killed after {timeout_s:g} s of wall time")
    if guard == "unknown":
        return result("error", f"the sandbox runner failed before the program started (exit {returncode}): {tail}")
    if returncode == 0:
        if sentinel.encode() in rest:
            return result("passed", tail)
        return result("failed", "the program exited with status 0 before it finished (sys.exit / os._exit)")
    if re.search(rb"^MemoryError", err, re.MULTILINE):
        return result("memory", tail)
    if returncode == -signal.SIGXCPU:
        return result("timeout", "killed by the CPU-time limit")
    if returncode == -signal.SIGKILL:
        # We only send SIGKILL on timeout, handled above; otherwise it is the kernel's out-of-memory killer.
        return result("memory", f"killed by SIGKILL (out of memory?) {tail}")
    if returncode < 0:
        return result("failed", f"killed by signal {-returncode} ({signal.strsignal(-returncode)}) {tail}")
    return result("failed", tail)

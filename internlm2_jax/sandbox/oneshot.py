"""`run_program`: a whole program as one cell of a fresh session, classified the way HumanEval and the RL doctest
reward need it: passed, failed, timeout, memory, or error (the sandbox itself could not run it)."""

import signal
import time
from dataclasses import dataclass

from internlm2_jax.sandbox.policy import SandboxPolicy
from internlm2_jax.sandbox.session import CellResult, PythonSession, SandboxError

DETAIL_CHARS = 2000


@dataclass(frozen=True)
class ExecResult:
    status: str  # "passed" | "failed" | "timeout" | "memory" | "error"
    detail: str  # the tail of stderr and the traceback, or why the run ended the way it did
    seconds: float
    network_guard: str  # "netns" | "socket-guard" (the Python-level layer used without a namespace) | "unknown"
    guards: frozenset[str] = frozenset()  # every guard the run had (session.guards)


def run_program(
    source: str, *, timeout_s: float = 10.0, memory_mb: int = 1024, allow_netns: bool = True
) -> ExecResult:
    """Run `source` as `__main__` in a fresh sandbox session and temporary directory; never raises for what the code
    does. `allow_netns=False` leaves out the network namespace, as on a host that cannot create one."""
    # No interrupt grace: nothing of a one-shot program is worth keeping. The CPU limit backs up the wall clock.
    policy = SandboxPolicy(wall_s=timeout_s, grace_s=0, cpu_s=int(timeout_s) + 2, memory_mb=memory_mb,
                           network_namespace=allow_netns)
    start = time.monotonic()
    try:
        with PythonSession(policy) as session:
            cell = session.run(source)
            guards = session.guards
    except SandboxError as exc:
        return ExecResult("error", str(exc)[-DETAIL_CHARS:], time.monotonic() - start, "unknown")
    network = "netns" if "netns" in guards else "socket-guard" if "socket-guard" in guards else "unknown"
    status, detail = _classify(cell, timeout_s)
    return ExecResult(status, detail, time.monotonic() - start, network, guards)


def _classify(cell: CellResult, timeout_s: float) -> tuple[str, str]:
    tail = (cell.stderr + (cell.error or ""))[-DETAIL_CHARS:]
    if cell.status == "ok":
        return "passed", tail
    if cell.status == "timeout":
        return "timeout", f"killed after {timeout_s:g} s of wall time"
    if cell.status == "memory":
        return "memory", tail
    if cell.status == "sandbox_error":
        return "error", tail
    if cell.status == "restarted":
        if cell.exit_code == 0:
            return "failed", "the program exited with status 0 before it finished (sys.exit / os._exit)"
        if cell.exit_code == -signal.SIGXCPU:
            return "timeout", "killed by the CPU-time limit"
        if cell.exit_code == -signal.SIGKILL:  # we kill only on timeout, handled above: the out-of-memory killer
            return "memory", f"killed by SIGKILL (out of memory?) {tail}"
    return "failed", tail

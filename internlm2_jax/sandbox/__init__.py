"""Running untrusted (model-written) Python: a stateful sandboxed interpreter (`PythonSession`, for agents) and
one-shot programs (`run_program`, for HumanEval and the RL doctest reward), both on the same guards. See
docs/agents.md §2.6 for the threat model; every guard is detected, applied when the host has it, and reported in
`PythonSession.guards` / `ExecResult.guards`."""

from internlm2_jax.sandbox.oneshot import ExecResult, run_program
from internlm2_jax.sandbox.policy import SandboxPolicy
from internlm2_jax.sandbox.session import CellResult, PythonSession, SandboxError, host_support

__all__ = ["CellResult", "ExecResult", "PythonSession", "SandboxError", "SandboxPolicy", "host_support",
           "run_program"]
